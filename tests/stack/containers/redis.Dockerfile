# Test-only stand-in for redis:7-alpine, from Debian's packages (no registry is reachable where the
# compose stack test runs). Same contract as the official image: `redis-server …` as the command, data
# in /data, a non-root user.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update -q && apt-get install -y -q --no-install-recommends redis-server redis-tools \
 && rm -rf /var/lib/apt/lists/* && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server"]
