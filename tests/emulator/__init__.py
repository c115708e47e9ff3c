"""Contract tests of the CXone emulator, over real HTTP against the emulator process."""
