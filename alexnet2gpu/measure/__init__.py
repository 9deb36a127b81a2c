"""Measurements that return plain records (rendering is :mod:`alexnet2gpu.report`'s job):
throughput (:mod:`.bench`), memory per device (:mod:`.memory`) and the side-by-side
comparison (:mod:`.compare`)."""
