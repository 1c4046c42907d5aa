"""Where the work runs: torch's thread count on a shared machine (``threads``), devices and the torchrun
process group (``distributed``), a watchdog for steps that stop making progress (``watchdog``). Nothing here
knows about models or run folders."""
