"""The sample-efficiency benchmark: planning and running the sweep, aggregating its runs, tables and plots."""
