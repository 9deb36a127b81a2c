"""Files that survive a crash: atomic writes (:mod:`.atomic`) and verified checkpoints
(:mod:`.checkpoints`). The lowest layer with :mod:`alexnet2gpu.errors`: it imports no
other part of the package."""
