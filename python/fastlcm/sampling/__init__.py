"""Sampling distilled students: ``fastlcm generate`` (:mod:`.generate`), ``fastlcm eval`` (:mod:`.evaluate`), the one
LCMScheduler helper and the sampler settings export records (:mod:`.scheduler`), students from folders
(:mod:`.student`)."""
