"""The embedded tiny default: the procedural captioned image set and its caption classifier
(:mod:`.procedural`), the trainer of the shipped tiny teacher (:mod:`.teacher`), and ``fastlcm demo``
(:mod:`.run`)."""
