"""Test peers for the test suite and the benchmarks; not part of the shipped packages.

``testing.peers`` holds the DICOM peers that only tests and ``bench/`` need (DCMTK storescp as the
tuned reference receiver, Orthanc with a REST client for checking what arrived) next to the
demo's own peers, so that neither tests nor benchmarks reach into the demo's modules.
"""
