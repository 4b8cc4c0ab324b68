"""Ideas beyond the assignment, one small module each with its own page under docs/, each proved
equal to the readable path (or, for the int8 cache, within a stated bound of it; for the paged
cache and the engine on it, paged.py and serving.py, to each request decoded alone). A module holds
the idea alone; its pictures, tables and benchmarks are its command in tools/ (tools/flash.py,
tools/window.py, ...), and nothing here imports tools/."""
