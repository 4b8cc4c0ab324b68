"""Ideas beyond the assignment, one small module each, each proved equal to the readable path."""
