"""`python -m swssl <command>`: the same as `swssl <command>`."""
from swssl.entry import main

if __name__ == "__main__":
    main()
