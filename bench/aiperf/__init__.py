"""Helpers of the aiperf Mooncake-trace driver (``bench/aiperf_mooncake.py``)."""
