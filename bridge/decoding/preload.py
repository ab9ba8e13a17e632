"""What the zygote imports once, for every worker it forks: the transcoder.

Two packages are kept out of that import, which the first instance waits for (about 0.3 s):
- `requests`, which pydicom imports when it is installed, only to download its own test data;
  no worker ever uses it (60-70 ms).
- `gdcm`, which pydicom's plugin registry imports at once although GDCM only ever decodes what
  the first decoder of a chain could not (25-40 ms, and 18 MB in every process). The codecs
  load it the first time a chain reaches it (bridge.dicom.codecs.load_deferred_gdcm).
"""

import sys

DEFERRED = ("requests", "gdcm")

_hidden = [name for name in DEFERRED if name not in sys.modules]
for _name in _hidden:
    sys.modules[_name] = None  # type: ignore[assignment]  # makes `import <name>` fail
try:
    import bridge.dicom.transcode  # noqa: F401
finally:
    for _name in _hidden:
        del sys.modules[_name]
