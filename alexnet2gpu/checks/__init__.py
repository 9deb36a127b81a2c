"""Looking at a net without training it: :mod:`.summary` plans every layer's device and
shape without hardware, :mod:`.verify` checks that every placement computes the same
function."""
