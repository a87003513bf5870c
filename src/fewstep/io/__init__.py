"""Writing files so that a crash never leaves half of one (atomic renames), and PNG images."""
