"""``python -m nbdist._agent <torchrun args>``: torchrun, plus two things nbdist needs.

It parses the same arguments and runs the same elastic agent as
``python -m torch.distributed.run``, and in addition

* writes ``failures.json`` beside the entry script when ranks fail: torchrun's
  per-rank exit codes (and so signal names), which no rank can report about itself;
* exits, killing every rank, when the caller that started it dies (a killed notebook
  kernel must not leave training processes behind).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from nbdist.jobdir import JobDir, write_bytes_atomic
from nbdist.launch.local import descendants
from nbdist.protocol import RankExit, encode_exits

PARENT_POLL = 0.5


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL)
    for pid in descendants(os.getpid()):
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except OSError:
            pass
    os._exit(1)


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True,
                     name="nbdist-parent-watch").start()
    args = parse_args(argv)
    try:
        run(args)
    except ChildFailedError as exc:
        failures = {rank: RankExit(exitcode=f.exitcode, pid=f.pid, local_rank=f.local_rank,
                                   timestamp=f.timestamp)
                    for rank, f in exc.failures.items()}
        job = JobDir(Path(args.training_script).parent)  # entry.py lies in its job folder
        write_bytes_atomic(job.failures, encode_exits(failures))
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    # run() has returned: the ranks and the rendezvous store are gone and failures.json
    # is written; nothing is left to clean up. Tearing down an interpreter that imported
    # torch takes ~0.7 s on a small machine, added to every job's wall time: skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
