"""What metric training (``epban.metric``) and SR training (``epban.sr``) share.

    distributed   the process group under ``torchrun`` (NCCL on CUDA, gloo on the CPU), the device, collectives
    checkpoint    RNG states, atomic writes of checkpoint files and directories
    records       JSON records (strict JSON, written atomically)
    run_folder    the --out folder: checked before any work, made naming --out; TrainingDiverged
"""
