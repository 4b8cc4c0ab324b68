"""Ideas beyond the assignment, one small module each (each has its page in docs/)."""
