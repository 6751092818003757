"""Tools around the engine: synthetic workloads, the roofline floor, dry runs, trace summaries,
plots and the scripts' shared flags."""
