"""Where the work runs: torch's thread count on a shared machine (``threads``), devices and the torchrun
process group (``distributed``). Nothing here knows about models or run folders."""
