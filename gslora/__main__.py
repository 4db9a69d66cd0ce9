"""`python -m gslora`: print versions and which backends are available here, and why not."""

from .info import info_text

print(info_text())
