"""What events add up to: call latencies paired per thread, histograms."""
