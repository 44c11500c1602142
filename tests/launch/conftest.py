# launch_testing files are run by `launch_test`, not collected by plain pytest (no launch here).
collect_ignore = ["test_bitmar_launch.py"]
