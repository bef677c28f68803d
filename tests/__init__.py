"""echotwist's tests: trial TestCases, collected by pytest."""
