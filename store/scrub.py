"""Take server paths out of error messages before a user sees them.

Why: loader and OS errors name files by absolute path ("/srv/rigl/datasets/x is not a directory");
shown to a user, that reveals the server's layout. The known roots become placeholders
(`<datasets>`, `<artifacts>`, `<data>`, `<home>`), and any other absolute path becomes `<path>`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ABSOLUTE = re.compile(r"(?<![\w.)\]/<>:-])/(?:[^\s'\"`,;:)\]}>]+)")
END = r"(?=[/\s'\"`,;:)\]}>]|$)"


def scrub_paths(message: str, settings=None) -> str:
    roots = []
    for url in (getattr(settings, "s3_endpoint_url", None), getattr(settings, "artifact_url", None)):
        if url:  # the bucket's endpoint and name are the server's layout too
            message = message.replace(url.rstrip("/"), "<artifact store>")
    if settings is not None:
        roots += [(settings.datasets_dir, "<datasets>"), (settings.artifact_dir, "<artifacts>"),
                  (settings.data_dir, "<data>")]
    roots.append((Path.home(), "<home>"))
    for root, placeholder in roots:
        if root is None:
            continue
        for form in {str(root), os.path.realpath(root)}:
            if len(form) > 1:
                message = re.sub(re.escape(form.rstrip("/")) + END, placeholder, message)
    return ABSOLUTE.sub("<path>", message)
