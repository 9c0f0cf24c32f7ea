"""Running a plan: the loop (read ahead, merge, write behind), the compute paths per tensor, threads and
memory, NaN/Inf checks, devices, progress, and the executors (local, Ray).
"""
