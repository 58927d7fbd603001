"""The ``mlx-dist bench*`` commands: ``generate`` (mlx-dist vs mlx-lm on one
device), ``ops`` (each op of a batched step), ``pipeline`` (1 device vs 2 and
3 workers), ``recovery`` (a worker killed mid-stream) and ``throughput``
(concurrent streams over stages and servers). ``models`` makes the models
they run; ``processes`` starts and stops the worker and server processes
they (and the tests) run."""
