"""The composition root: the `splitspec` command (`cli`) and its load generator (`bench`). It sits
on top of the services and imports each one only inside the command that runs it; nothing in the
services or the shared core imports it."""
