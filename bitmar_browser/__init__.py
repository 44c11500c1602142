"""BitMar memory browser: a local web page to see and search what a robot remembers.

It reads the node's episode store through ``bitmar_core`` (no ROS), read-only and beside a live
node. ``bitmar_memory_browser --store DIR`` (or ``python -m bitmar_browser``) starts it.
"""
