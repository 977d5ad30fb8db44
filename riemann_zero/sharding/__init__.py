"""Where adapter rows live under each engine and which collective runs; knows torch and
DeepSpeed, never PEFT (adapters are seen through ``params.AdapterLike``). How each engine lays a
parameter out is one object per engine kind, in ``layouts.py``."""
