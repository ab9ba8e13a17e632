"""The DICOM byte work: bytes in, Explicit (or Implicit) VR Little Endian bytes out. Pure: no
network, no files, no processes, no threads but frames' decoding pool.

header (read a file's header without pydicom), codestream and jpegls_presets (check each
compressed frame before a decoder sees it), lossy, vr, dicomfile (parse and write with pydicom),
codecs (the decoder chains), verdicts (what a decoder's failure means), frames (multi-frame
JPEG 2000 on threads), transcode (the whole conversion), implicit (to Implicit VR).

Imported by bridge.decoding (its processes run transcode) and, for header, lossy and
implicit only, by the engines in the main process. Imports only bridge.jobs, bridge.uids,
bridge.errors and bridge.metrics.
"""
