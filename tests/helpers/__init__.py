"""What the tests share: tiny models and specs, oracles (mergekit, peft), a fake Hub, the hostile-input
catalogue. Only the test_*.py files beside this folder are tests."""
