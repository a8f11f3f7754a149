"""Shared quota state: reserve at admission, settle on real usage."""
