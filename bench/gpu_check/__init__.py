"""bench/gpu_check.sh: the one-call GPU check (driver.py runs it)."""
