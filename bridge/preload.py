"""What the zygote imports once, for every worker it forks: the transcoder.

pydicom imports `requests` when it is installed, only to download its own test data; no
worker ever uses it. Hiding it during the import saves the zygote 60-70 ms of
start-up (of about 0.3 s), which the first instance would otherwise wait for.
"""

import sys

_hidden = "requests" not in sys.modules
if _hidden:
    sys.modules["requests"] = None  # type: ignore[assignment]  # makes `import requests` fail
try:
    import bridge.transcode  # noqa: F401
finally:
    if _hidden:
        del sys.modules["requests"]
