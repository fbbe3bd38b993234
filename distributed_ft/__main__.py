"""``python -m distributed_ft`` is the ``dft`` CLI (for torchrun, accelerate launch and deepspeed)."""

from distributed_ft.cli import main

raise SystemExit(main())
