"""The decoding processes: bridge.dicom's work run where a crash, a hang or a memory blow-up
costs one instance, not the bridge.

pool (the main process's side: a pool of worker processes, their pipes, timeouts and
replacements), zygote (the decoders' parent, forked from instead of starting interpreters),
limits (each instance's memory and time allowance), preload (what the zygote imports), cpus
(the cores this process may use).

Imported by the engines and, for cpus, by bridge.config. Imports bridge.dicom only inside the
decoding processes (an import-linter contract keeps decoders out of the main process).
"""
