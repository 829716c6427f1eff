"""The trainer of `fastlcm train`: what a run builds (:mod:`.setup`, :mod:`.models`, :mod:`.lora`,
:mod:`.compile`), one step (:mod:`.step`), the loop (:mod:`.loop`), and what it writes (:mod:`.checkpoint`,
:mod:`.export`, :mod:`.validation`); :mod:`.preflight` checks a config against the outside world first."""
