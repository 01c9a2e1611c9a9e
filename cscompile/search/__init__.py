"""Joint depth × precision search under measured latency (issue 8); see :mod:`cscompile.search.joint`."""
