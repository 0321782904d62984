"""Frozen: fetch, patch, build and prove the frozen run state on KVM."""
