"""Test doubles and dev tools for pp1 (not part of the serving runtime): ``fake_front`` (a
``FrontAPI`` without a mesh), ``dev`` (the server on the fake front: ``python -m pp1.testing.dev``)."""
