"""On-device runtime: no torch. Preprocessing, vision backends, resampler, llama.cpp decoder."""
