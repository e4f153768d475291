"""Tests of the discovery plane: stores, registration layout and the real-server fixtures."""
