"""What a run reads: input entries (folders, globs, lists, tars), image decoding and
limits, privacy blurring, detector box files."""
