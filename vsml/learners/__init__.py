"""Learners: the learner protocol, VSML's factory, baselines (SGD, Adam, Hebbian, Meta-RNN), Micro-Badger."""
