"""torchrun (`torch.distributed.run`) as the launcher starts it: the same program and flags, except that a stop ends
it without a traceback.

torchrun answers SIGINT, SIGTERM and SIGHUP by passing the signal to its workers (which save a checkpoint and stop)
and then raising SignalException out of its main: 25 lines of traceback after every Ctrl-C of `lora-cli train
--gpus N`. Here that exception ends the process with exit status 128 + the signal's number; torchrun's own
"Received ... death signal" line and the launcher's closing line say what happened.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main

if __name__ == "__main__":
    try:
        main()
    except SignalException as e:
        sys.exit(128 + int(e.sigval))
