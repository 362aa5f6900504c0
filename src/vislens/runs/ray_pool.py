"""Several model copies at once: a run's images sharded over Ray actors.

`--workers N` starts N actors on this machine, `--ray ADDRESS` on a running
cluster; each actor loads the model once (and holds one GPU with `--device
cuda`). Without either option nothing here imports Ray: the single-process run
is the default and Ray an optional extra (`pip install 'vislens[ray]'`).

Experiments are written once, against an executor (vislens.runs.local): `Local`
runs their units in this process one after another, `RayPool` hands the same units
to the same unit functions on its actors. A unit is what one flush of the single-process
loop covers (a sample, or a batch of samples), so an actor builds the same
batches the single-process run builds and writes the same rows. Why the rest
is as it is:

- Part names: the unit with ordinal i of a map writes `part-{base + i:05d}`,
  base being one past the highest part number on disk when the map starts.
  Names never collide, a sorted listing holds the rows in the single-process
  order (so summaries match it to the last bit), and a unit redone after its
  worker died rewrites its own part instead of adding its rows twice.
- Resume: the driver plans only the units whose keys are not on disk, from
  every part, whoever wrote it; a unit handed out again first rereads them.
- Failure: a dead worker's unit goes to another worker; the run stops (one
  line, exit 2) only when no worker is left, and a rerun resumes from the
  parts. A driver that dies takes its actors with it (Ray ties non-detached
  actors to their driver); whatever they had finished is already on disk, a
  part being written to a temporary name and renamed.
- Summary: computed once, on the driver, from all parts, by the experiment's
  own summarise (which only needs the model's name and depth, not the model).
- What the whole run needs once (ablation's mean image embedding, artifact
  scores, study accuracy) runs on one worker (`call`) and is shipped to all.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from typing import Any

from vislens.errors import VislensError
from vislens.models.families import family_for
from vislens.runs.handle import ModelHandle
from vislens.runs.ray_cluster import auth_refused, check, refused_for_auth
from vislens.runs.rundir import RunDir


class Models:
    """Where a command's model lives: this process (the default), or a RayPool shut down by
    close()."""

    def __init__(self, workers: int = 0, address: str | None = None):
        check(workers, address)
        self.workers, self.address = workers, address or None
        self.pool: RayPool | None = None

    @property
    def pooled(self) -> bool:
        return bool(self.workers or self.address)

    def load(self, model: str, device: str = "cpu", dtype: str | None = None,
             local: Callable | None = None, **where) -> ModelHandle:
        """The model here (`local(model, device, dtype, **where)`, vislens.models.load by
        default; where: a device map) or a started RayPool."""
        if not self.pooled:
            if local is not None:
                return local(model, device, dtype, **where)
            from vislens.models import load

            return load(model, device=device, dtype=dtype, **where)
        if where:
            raise VislensError("--device-map spreads one model over this machine's devices; "
                               "--workers / --ray give each worker a whole model: use one "
                               "or the other")
        self.close()
        self.pool = RayPool.start(model, device, dtype, self.workers, self.address)
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


class _Worker:
    """One model copy in a Ray actor (made a Ray actor class by RayPool, so that importing
    this module never imports Ray)."""

    def __init__(self, model: str, device: str, dtype: str | None, threads: int | None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.vlm, self.error, self.out, self.run_spec = None, None, None, None
        try:
            from vislens.models import load

            self.vlm = load(model, device=device, dtype=dtype)
        except Exception as err:  # noqa: BLE001 - raised again by info(), as a one-line error
            self.error = err

    def info(self) -> dict:
        if self.error is not None:
            raise self.error
        return {"family": self.vlm.model_type, "num_layers": self.vlm.num_layers,
                "device": str(self.vlm.device), "pid": os.getpid()}

    def call(self, fn: Callable, args: tuple) -> Any:
        return _to_cpu(fn(self.vlm, *args))

    def open(self, spec: tuple | None) -> None:
        self.run_spec = spec
        self.out = None if spec is None else RunDir(spec[0], spec[1], spec[2])

    def unit(self, fn: Callable, unit: Any, args: tuple, index: int, retry: bool) -> Any:
        if self.out is not None and retry:
            self.out.reload()
        try:
            result = fn(self.vlm, self.out, unit, *args)
        except BaseException:
            self.open(self.run_spec)  # rows of a failed unit are never written by the next one
            raise
        if self.out is not None:
            self.out.flush_as(index)
        return _to_cpu(result)


def _to_cpu(value: Any) -> Any:
    """Tensors come back on the CPU: the driver may have no GPU (units move them back)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        return value.detach().cpu()
    return value


class RayPool:
    """N actors, one model each, and the driver's view of the model (name, family, depth).

    Passed to an experiment in place of the model; `executor` picks it up.
    """

    def __init__(self, name: str, device: str, actors: list, options: dict, owns_ray: bool,
                 family: str, num_layers: int):
        self.name, self.device = name, device
        self.actors, self.options, self.owns_ray = actors, options, owns_ray
        self.model_type, self.num_layers = family, num_layers
        self.family = family_for(family)
        self.deaths: list[BaseException] = []  # why workers were lost, newest last

    @property
    def info(self) -> RayPool:
        return self

    def require_layout(self, what: str) -> None:
        self.family.require_layout(what)

    @classmethod
    def start(cls, model: str, device: str = "cpu", dtype: str | None = None, workers: int = 0,
              address: str | None = None) -> RayPool:
        """Start (or join) Ray and N actors; returns once every model is loaded."""
        import ray

        check(workers, address)
        _errors_to_stderr()
        owns = not ray.is_initialized()
        if owns:
            kwargs = {"include_dashboard": False, "log_to_driver": False,
                      "logging_level": logging.ERROR}
            try:
                if address:
                    ray.init(address=address, **kwargs)
                else:
                    # a cluster of this machine alone, reachable from nowhere else
                    ray.init(address="local", num_cpus=_local_cpus(),
                             _node_ip_address="127.0.0.1", **kwargs)
            except Exception as err:
                if address and refused_for_auth(err):
                    raise auth_refused(address) from None
                if not isinstance(err, (ConnectionError, RuntimeError, ValueError)):
                    raise
                raise VislensError(f"could not start or join Ray"
                                   f"{f' at {address}' if address else ''}: "
                                   f"{' '.join(str(err).split())}") from None
        try:
            return cls._with_actors(model, device, dtype, workers, owns)
        except BaseException:
            if owns:
                ray.shutdown()
            raise

    @classmethod
    def _with_actors(cls, model, device, dtype, workers, owns) -> RayPool:
        import ray

        # what is free now, not the cluster's size: an actor asking for more than that
        # would wait for it forever
        free = ray.available_resources()
        gpu = str(device).startswith("cuda")
        if gpu and str(device) != "cuda":
            raise VislensError(f"--device {device} with --workers / --ray: each worker gets a "
                               "GPU of its own; pass --device cuda")
        if not workers:  # --ray alone: one worker per free GPU (or per node on CPUs)
            workers = int(free.get("GPU", 0)) if gpu else len([n for n in ray.nodes()
                                                               if n.get("Alive")])
        if gpu and free.get("GPU", 0) < max(workers, 1):
            raise VislensError(f"--device cuda with {workers} workers needs {workers} free GPUs; "
                               f"the Ray cluster has {int(free.get('GPU', 0))}: lower --workers")
        if gpu:
            options, threads = {"num_gpus": 1, "num_cpus": 0}, None
        else:
            share = math.floor(100 * free.get("CPU", 0) / workers) / 100  # Ray's 0.01 steps
            options, threads = {"num_cpus": share}, max(1, math.floor(share))
        options["max_restarts"] = 0
        make = ray.remote(_Worker).options(**options)
        args = (model, "cuda" if gpu else device, dtype, threads)
        actors = [make.remote(*args) for _ in range(workers)]
        infos = []
        try:
            for actor in actors:
                infos.append(ray.get(actor.info.remote()))
        except BaseException as err:
            for actor in actors:
                with suppress(Exception):
                    ray.kill(actor)
            raise _cause(err) from None
        pool = cls(str(model), device, actors, {"make": make, "args": args}, owns,
                   infos[0]["family"], infos[0]["num_layers"])
        return pool

    # ---- running --------------------------------------------------------------------------
    def call(self, fn: Callable, *args, progress: Callable | None = None) -> Any:
        """fn(vlm, *args) on one worker (another if it dies); no progress bar out there."""
        import ray
        from ray.exceptions import RayError, RayTaskError

        while self.actors:
            actor = self.actors[0]
            try:
                return ray.get(actor.call.remote(fn, args))
            except RayTaskError as err:
                raise _cause(err) from None
            except RayError as err:
                self._lost(actor, err)
        raise VislensError(f"every Ray worker died{self._why()}; rerun the same command to "
                           "resume")

    def map(self, fn: Callable, units: Sequence, *args, out=None,
            progress: Callable | None = None, label: str = "") -> list:
        """fn(vlm, out, unit, *args) for every unit, each on whichever worker is free; the
        rows of unit i go to part base + i of `out`. Returns fn's results in unit order."""
        import ray
        from ray.exceptions import RayError, RayTaskError

        units = list(units)
        if not units:
            return []
        base, spec = 0, None
        if out is not None:
            out.flush()
            base, spec = out.next_index(), (str(out.path), out.config, list(out.key))
        shared = ray.put(args)
        for actor in list(self.actors):
            try:
                ray.get(actor.open.remote(spec))
            except RayError:
                self._lost(actor)
        queue, redo = deque(range(len(units))), set()
        results: list = [None] * len(units)
        running: dict = {}
        idle = list(self.actors)
        ticks = _ticks(progress, len(units), label)
        try:
            while queue or running:
                while idle and queue:
                    actor, i = idle.pop(0), queue.popleft()
                    ref = actor.unit.remote(fn, units[i], shared, base + i, i in redo)
                    running[ref] = (actor, i)
                if not running:
                    raise VislensError(f"every Ray worker died{self._why()}; rerun the same "
                                       "command to resume from the parts written so far")
                (ref,), _ = ray.wait(list(running), num_returns=1)
                actor, i = running.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except RayTaskError as err:
                    raise _cause(err) from None
                except RayError as err:  # the worker died (killed, crashed, out of memory)
                    self._lost(actor, err)
                    queue.appendleft(i)
                    redo.add(i)
                    continue
                idle.append(actor)
                next(ticks, None)
        except BaseException:
            self._stop([actor for actor, _ in running.values()])
            raise
        finally:
            ticks.close()
            if out is not None:
                out.reload()
        return results

    def _lost(self, actor, err: BaseException | None = None) -> None:
        import ray

        with suppress(Exception):
            ray.kill(actor)
        if actor in self.actors:
            self.actors.remove(actor)
        if err is not None:
            self.deaths.append(err)

    def _why(self) -> str:
        """The one cause worth naming: Ray's memory monitor kills workers whenever the node is
        over 95% full, whoever filled it."""
        from ray.exceptions import OutOfMemoryError

        last = " ".join(str(self.deaths[-1]).split()).lower() if self.deaths else ""
        # the monitor's own words (a crash lists "the OOM killer" among its "common causes",
        # which says nothing)
        if (self.deaths and isinstance(self.deaths[-1], OutOfMemoryError)) or \
                "running low on memory" in last or \
                ("memory usage" in last and "exceeded threshold" in last):
            return (" (the last one was killed for memory: Ray stops workers when the node's "
                    "memory is over 95% full; free memory or use fewer workers)")
        return ""

    def _stop(self, busy: list) -> None:
        """A map left early (an error, Ctrl-C): its busy workers are killed, so none of them
        writes a part later under a number the next map hands out, and replaced by fresh
        ones (which get the killed workers' resources; they load in the background, and
        calls to them wait for that)."""
        for actor in busy:
            self._lost(actor)
            with suppress(Exception):
                self.actors.append(self.options["make"].remote(*self.options["args"]))

    def close(self) -> None:
        import ray

        for actor in self.actors:
            with suppress(Exception):
                ray.kill(actor)
        self.actors = []
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()

    @property
    def workers(self) -> int:
        return len(self.actors)


def _errors_to_stderr() -> None:
    """What raylets report to the driver (a worker that died, ...) goes to stderr: Ray prints
    it on stdout, whatever log_to_driver says, where `--json` promises the summary alone."""
    try:
        from ray._private import worker
    except ImportError:
        return
    plain = getattr(worker, "print_to_stdstream", None)
    if plain is None or getattr(plain, "to_stderr", False):
        return

    def print_to_stderr(data, *args, **kwargs):
        return plain({**data, "is_err": True}, *args, **kwargs)

    print_to_stderr.to_stderr = True
    worker.print_to_stdstream = print_to_stderr


def _cause(err: BaseException) -> BaseException:
    """The error a worker raised, as it would have been raised here (one line at the CLI)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def _ticks(progress: Callable | None, n: int, label: str) -> Iterator:
    """A progress bar advanced by next() once per finished unit (the first next() shows 0)."""
    def gen():
        if progress is None:
            while True:
                yield
        yield from progress(range(n), label)

    ticks = gen()
    next(ticks, None)
    return ticks


def _local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
