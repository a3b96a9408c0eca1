"""Generation: the contiguous-cache generator now; the paged engine later."""
