"""Tools beside the pipeline package: the team tracking server, the benchmark, code deps, the dvc.lock merge driver."""
