"""dtypelab's benchmarks: ratios against the baseline a user would otherwise use, in one run."""
