"""Talking to the servers: the source Orthanc and every kind of target, each a Peer (peer).

http (the one HTTP layer: timeouts, TLS, auth, every failure translated into bridge.errors),
orthanc (Orthanc's REST API), dicomweb, dicomjson and batcher (a DICOMweb archive: STOW-RS
answers read per instance, requests shared by the transfer threads), dimse, associations and
commitment (a DICOM node: C-STORE, C-ECHO, Storage Commitment, on pynetdicom, loaded only when
a dicom target is configured), retry (the one retry policy), feed (the source's /changes).

Imported by the engines, the watchers and the commands. Imports bridge.config, bridge.dicom's
header (and implicit, for a DICOM node), bridge.metrics, bridge.outcomes and bridge.errors.
"""
