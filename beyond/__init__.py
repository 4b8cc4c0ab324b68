"""Ideas beyond the assignment, one small module each with its own page under docs/, each proved
equal to the readable path (or, for the int8 cache, within a stated bound of it)."""
