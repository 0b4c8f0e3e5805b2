"""Where masks come from: mask sources (SAM's point grid, box prompts, the detector's
boxes, pasted objects), the mask records they return, and the paste plan of augment."""
