# Test-only stand-in for postgres:16-alpine, from Debian's packages (PostgreSQL 15 on bookworm). Same
# contract as the official image: POSTGRES_USER / POSTGRES_PASSWORD(_FILE) / POSTGRES_DB create the role and
# database on first start, data in /var/lib/postgresql/data, password auth over TCP, pg_isready on PATH.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update -q && apt-get install -y -q --no-install-recommends postgresql \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
 && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql && chmod 700 /var/lib/postgresql/data
COPY tests/stack/containers/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PGDATA=/var/lib/postgresql/data
USER postgres
EXPOSE 5432
ENTRYPOINT ["sh", "/usr/local/bin/postgres-entrypoint.sh"]
