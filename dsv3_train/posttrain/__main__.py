from dsv3_train.posttrain.cli import main

if __name__ == "__main__":
    main()
